from h_classifiers.commands.train_toy import main


main()
